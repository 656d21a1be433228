"""`ling-train align`: where do two settings (device, dtype, kernels, attention backend) part ways?

Builds the model once (a preset with [model] overrides from --config, or a checkpoint), draws one
batch of random token ids from --seed, runs it forward and backward under --a and --b, and writes
RUN/align.md (per-module table) and RUN/align.png; prints the first module beyond tolerance.
Exit codes as `ling-train`: 0 ran (whatever it found), 2 bad input, 1 internal error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  ling-train align --a cpu:fp32 --b cpu:bf16 --out align/            # what bf16 autocast changes
  ling-train align --a cpu:fp32:kernels=reference --b cpu:fp32:kernels=fast --out align/
  ling-train align --a cpu:fp32:sdpa=math --b cuda:bf16 --checkpoint runs/x/checkpoints/step-300 --out align/
  ling-train align --a cpu:fp32 --b cpu:bf16 --config run.toml --fail-beyond   # exit 3 if misaligned
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ling-train align", description=__doc__.splitlines()[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="reference setting DEVICE:DTYPE[:kernels=..][:sdpa=..]")
    p.add_argument("--b", required=True, help="compared setting, same form")
    p.add_argument("--out", required=True, help="directory for align.md and align.png")
    p.add_argument("--size", help="model preset (default: the config's, else tiny)")
    p.add_argument("--config", help="run TOML: its size and [model] overrides")
    p.add_argument("--checkpoint", help="a step-N checkpoint (HF layout) to load weights from")
    p.add_argument("--batch-size", type=int, default=2, dest="batch_size")
    p.add_argument("--seq-len", type=int, default=64, dest="seq_len")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, help="max relative error (default by dtype: fp32 1e-4, "
                                                     "fp16 1e-2, bf16 5e-2)")
    p.add_argument("--fail-beyond", action="store_true", help="exit 3 when a module is beyond tolerance")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    import torch

    from ling_core import CheckpointError, ConfigError, build_model, from_pretrained
    from ling_train.align import Setting, SettingError, align
    from ling_train.config import RunConfigError, load_toml, resolve

    try:
        a, b = Setting.parse(args.a), Setting.parse(args.b)
        for flag, setting in (("--a", a), ("--b", b)):
            if torch.device(setting.device).type == "cuda" and not torch.cuda.is_available():
                raise SettingError(f"{flag} {setting}: CUDA is not available on this machine")
        if args.batch_size < 1 or args.seq_len < 1:
            raise SettingError("--batch-size and --seq-len: must be >= 1")
        if args.checkpoint:
            model = from_pretrained(Path(args.checkpoint))
        else:
            values = load_toml(args.config) if args.config else {}
            config = resolve(values, {"size": args.size}, source=args.config or "flags")
            model = build_model(config.model_config(), device="cpu", seed=args.seed)
    except (SettingError, RunConfigError, ConfigError, CheckpointError) as e:
        print(f"ling-train align: error: {e}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(model.config.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
    model.train()  # the training forward: routing as in training, losses with their auxiliaries
    report = align(model, (ids[:, :-1], ids[:, 1:]), a, b, lambda m, batch: m(*batch).loss, args.tolerance)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.plot(out / "align.png")
    from ling_core.hf_io import write_text_atomic
    write_text_atomic(out / "align.md", report.to_markdown("align.png"))
    first = report.first_beyond
    print(f"{b} vs {a}: loss {report.loss_b:.6f} vs {report.loss_a:.6f}; first module beyond "
          f"{report.tolerance:g}: {first.name + f' ({first.worst():.2e})' if first else 'none'}; "
          f"report: {out / 'align.md'}")
    return 3 if first is not None and args.fail_beyond else 0
