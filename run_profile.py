"""Read a run profile (configs/<name>.json: per stage the learning rate, epochs, training examples and flags)
for the shell scripts: `eval "$(python3 run_profile.py quick)"` defines PROFILE_TASK, PROFILE_MAX_SEQ_LENGTH,
PROFILE_TRAIN_BATCH_SIZE, PROFILE_AUGMENT (0/1), PROFILE_BF16 (0/1/auto), PROFILE_INFERENCE_BATCH_SIZES,
GRAFT_DEFAULT (0/1) and one bash array of run_glue.py / train_gate.py flags per stage: TEACHER_ARGS, W_ARGS,
D_ARGS, F_ARGS, GATE_ARGS. The reasons for each profile's values are in docs/profiles.md.

Only the standard library: the scripts run it with python3 (not $PYTHON, which tests replace by a stand-in).
`python3 run_profile.py --bf16_supported` exits 0 iff torch sees a CUDA GPU with bfloat16 (run with the
project's Python)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
STAGES = {"teacher": "TEACHER_ARGS", "width": "W_ARGS", "depth": "D_ARGS", "final": "F_ARGS", "gates": "GATE_ARGS"}
STAGE_KEYS = {"learning_rate", "num_train_epochs", "max_train_samples", "flags", "graft"}
# train_gate.py's own data keys: only the gates stage may hold them (run_glue.py has no such flag)
GATE_STAGE_KEYS = {"skip_train_samples"}


class ProfileError(ValueError):
    pass


def profile_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def load_profile(name: str) -> dict:
    """configs/<name>.json, its shape checked."""
    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        raise ProfileError(f"unknown profile '{name}' (one of {', '.join(profile_names())})")
    try:
        profile = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProfileError(f"{path}: cannot read JSON ({err})") from None
    stages = profile.get("stages") if isinstance(profile, dict) else None
    if not isinstance(stages, dict) or set(stages) != set(STAGES):
        raise ProfileError(f"{path}: 'stages' must hold exactly {', '.join(STAGES)}")
    for stage, values in stages.items():
        keys = STAGE_KEYS | (GATE_STAGE_KEYS if stage == "gates" else set())
        if not isinstance(values, dict) or set(values) - keys or not isinstance(values.get("flags", []), list):
            raise ProfileError(f"{path}: stage '{stage}' takes {', '.join(sorted(keys))} (flags: a list)")
    return profile


def stage_args(stage: dict) -> list[str]:
    """The stage's run_glue.py / train_gate.py flags (the graft flag is the script's: GRAFT can override it)."""
    args = ["--learning_rate", str(stage["learning_rate"]), "--num_train_epochs", str(stage["num_train_epochs"])]
    for key in ("skip_train_samples", "max_train_samples"):
        if stage.get(key) is not None:
            args += [f"--{key}", str(stage[key])]
    return args + [str(flag) for flag in stage.get("flags", [])]


def shell_assignments(profile: dict) -> str:
    def array(values: list) -> str:
        return "(" + " ".join(shlex.quote(str(v)) for v in values) + ")"

    bf16 = profile.get("bf16", False)
    lines = [f"PROFILE_TASK={shlex.quote(profile['task'])}",
             f"PROFILE_MAX_SEQ_LENGTH={int(profile['max_seq_length'])}",
             f"PROFILE_TRAIN_BATCH_SIZE={int(profile['per_gpu_train_batch_size'])}",
             f"PROFILE_AUGMENT={int(bool(profile.get('augment', False)))}",
             f"PROFILE_BF16={'auto' if bf16 == 'auto' else int(bool(bf16))}",
             f"PROFILE_INFERENCE_BATCH_SIZES={shlex.quote(' '.join(map(str, profile['inference_batch_sizes'])))}",
             f"GRAFT_DEFAULT={int(bool(profile['stages']['width'].get('graft', False)))}"]
    lines += [f"{variable}={array(stage_args(profile['stages'][stage]))}" for stage, variable in STAGES.items()]
    return "\n".join(lines)


def bf16_supported() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def main(argv: list[str]) -> int:
    if argv == ["--bf16_supported"]:
        return 0 if bf16_supported() else 1
    if len(argv) != 1:
        print(f"usage: run_profile.py PROFILE (one of {', '.join(profile_names())}) | --bf16_supported",
              file=sys.stderr)
        return 2
    try:
        print(shell_assignments(load_profile(argv[0])))
    except (ProfileError, KeyError, TypeError, ValueError) as err:
        print(f"error: profile {argv[0]}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
