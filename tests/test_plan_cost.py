"""Step time, cost and the layout search; the `ling-plan cost` command line."""

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_core import preset
from ling_train.plan.cli import main
from ling_train.plan.cost import cheapest, plan_layout
from ling_train.plan.devices import Cluster, DeviceClass, load_device_table
from ling_train.plan.memory import Layout
from ling_train.plan.timing import Assumptions, estimate_step

EXAMPLE = Path(__file__).parents[1] / "examples" / "ling_report_devices.toml"
DEVICE = DeviceClass("X", bf16_tflops=300, memory_gib=80, intra_node_gbps=300, inter_node_gbps=25,
                     price_per_hour=10)


@settings(max_examples=40, deadline=None)
@given(tokens=st.floats(1e9, 1e13), factor=st.floats(1.5, 100), fsdp_exp=st.integers(0, 6),
       ep_exp=st.integers(0, 3), replicas_exp=st.integers(0, 2), recompute=st.booleans())
def test_cost_is_linear_in_tokens_at_a_fixed_layout(tokens, factor, fsdp_exp, ep_exp, replicas_exp, recompute):
    config = preset("lite")
    layout = Layout(256, fsdp=2 ** fsdp_exp, ep=2 ** ep_exp, replicas=2 ** replicas_exp, recompute=recompute)
    cluster = Cluster("c", DEVICE, 256)
    a = plan_layout(config, cluster, layout, tokens, 4096, 2 ** 22)
    b = plan_layout(config, cluster, layout, tokens * factor, 4096, 2 ** 22)
    assert math.isclose(b.cost, factor * a.cost, rel_tol=1e-9)
    assert math.isclose(b.days, factor * a.days, rel_tol=1e-9)


def test_compute_bound_step_matches_flops_at_the_assumed_mfu():
    # One device, nothing to communicate: the step is FLOPs / (peak x MFU) exactly.
    from ling_core import flops_per_token
    config = preset("tiny")
    step = estimate_step(config, Layout(1, micro_batch=4), DEVICE, 256, 4 * 256, Assumptions(mfu=0.5))
    assert step.fsdp_s == step.expert_all_to_all_s == step.local_sgd_s == 0
    assert math.isclose(step.step_s, flops_per_token(config, 256) * 1024 / (300e12 * 0.5))
    assert math.isclose(step.mfu, 0.5)


def test_slower_links_never_make_a_step_faster():
    config = preset("plus")
    layout = Layout(1024, fsdp=1024, ep=8, recompute=True)
    fast = estimate_step(config, layout, DEVICE, 4096, 2 ** 22, Assumptions(bandwidth_scale=1.0))
    slow = estimate_step(config, layout, DEVICE, 4096, 2 ** 22, Assumptions(bandwidth_scale=0.25))
    assert slow.step_s > fast.step_s and slow.expert_all_to_all_s == 4 * fast.expert_all_to_all_s


def test_cheapest_is_no_dearer_than_any_feasible_layout():
    config = preset("lite")
    cluster = Cluster("c", DEVICE, 64)
    best, _ = cheapest(config, cluster, 1e11, 4096, 2 ** 20)
    for layout in (Layout(64, fsdp=8), Layout(64, fsdp=64, ep=8), Layout(64, fsdp=8, replicas=8, recompute=True)):
        plan = plan_layout(config, cluster, layout, 1e11, 4096, 2 ** 20)
        if plan.feasible:
            assert best.cost <= plan.cost


def test_nothing_fits_reports_the_closest_reason():
    tiny_device = DeviceClass("small", 100, 4, 100, 10, 1)
    best, closest = cheapest(preset("plus"), Cluster("c", tiny_device, 8), 1e12, 4096, 2 ** 22)
    assert best is None and "do not fit" in closest.why_infeasible


def test_cli_reproduces_the_report_table(tmp_path, capsys):
    code = main(["cost", "--size", "plus", "--tokens", "1T", "--devices", str(EXAMPLE),
                 "--reference", "D=6.35e6", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "| D | D | 1024 |" in out and "6.35M RMB" in out
    assert (tmp_path / "plan.md").read_text().strip() == out.strip()
    assert (tmp_path / "plan.png").stat().st_size > 10_000


def test_cli_fixed_layout_explains_infeasibility(capsys):
    code = main(["cost", "--size", "plus", "--devices", str(EXAMPLE), "--fsdp", "1", "--ep", "8"])
    assert code == 0
    assert "infeasible: experts do not fit: " in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "lots"], "--tokens: expected a positive number"),
    (["--mfu", "1.5"], "--mfu: expected a fraction"),
    (["--size", "huge"], "unknown size 'huge'"),
    (["--reference", "D"], "--reference: expected NAME[,NAME...]=COST"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(["cost", "--devices", str(EXAMPLE), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_cli_bad_table_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace("memory_gib = 96", "memory_gib = 0", 1))
    assert main(["cost", "--devices", str(bad)]) == 2
    assert f"{bad}:21: [[device]] memory_gib" in capsys.readouterr().err
    assert load_device_table(EXAMPLE).devices["B"].memory_gib == 96


def test_local_sgd_sync_is_amortised_and_edit_hides_it():
    config = preset("lite")
    layout = Layout(64, fsdp=8, replicas=8)
    slow_link = DeviceClass("slow", 300, 80, 300, 0.5, 1)
    plain = estimate_step(config, layout, slow_link, 4096, 2 ** 20, Assumptions(edit_overlap=0.0, sync_every=10))
    rarer = estimate_step(config, layout, slow_link, 4096, 2 ** 20, Assumptions(edit_overlap=0.0, sync_every=100))
    edit = estimate_step(config, layout, slow_link, 4096, 2 ** 20, Assumptions(sync_every=10))
    assert plain.local_sgd_s == pytest.approx(10 * rarer.local_sgd_s)
    assert 0 < edit.local_sgd_s < plain.local_sgd_s
    single = estimate_step(config, Layout(64, fsdp=8), slow_link, 4096, 2 ** 20)
    assert single.local_sgd_s == 0


def test_local_sgd_replicas_pay_for_their_anchor_in_memory():
    from ling_train.plan.memory import memory_per_device
    config = preset("lite")
    one = memory_per_device(config, Layout(64, fsdp=8), 4096)
    many = memory_per_device(config, Layout(64, fsdp=8, replicas=8), 4096)
    assert one.local_sgd == 0 and many.local_sgd == pytest.approx(2 * one.weights)
