import pytest

from ling_kernels.dispatch import kernel_mode, use_fast_path


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("LING_KERNELS", raising=False)
    assert kernel_mode() == "auto"


def test_env_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("LING_KERNELS", "reference")
    assert kernel_mode() == "reference"
    monkeypatch.setenv("LING_KERNELS", "fast")
    assert kernel_mode() == "fast"


def test_invalid_value_names_variable_and_choices(monkeypatch):
    monkeypatch.setenv("LING_KERNELS", "triton")
    with pytest.raises(ValueError) as error:
        use_fast_path("my_op", available=True)
    message = str(error.value)
    assert "my_op" in message and "LING_KERNELS" in message and "'triton'" in message
    for mode in ("reference", "fast", "auto"):
        assert mode in message


@pytest.mark.parametrize(
    "mode, available, preferred, expected",
    [
        ("auto", True, True, True),
        ("auto", True, False, False),
        ("auto", False, False, False),
        ("reference", True, True, False),
        ("fast", True, True, True),
        ("fast", True, False, True),
        ("fast", False, False, False),
    ],
)
def test_path_selection(monkeypatch, mode, available, preferred, expected):
    monkeypatch.setenv("LING_KERNELS", mode)
    assert use_fast_path("op", available=available, preferred=preferred) is expected
