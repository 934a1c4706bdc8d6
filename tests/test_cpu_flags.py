"""The CPU XLA defaults are added before jax starts, and never override a user."""

import os
import subprocess
import sys

SNIPPET = (
    "import os; from fcn_jax import cpu_flags; cpu_flags.configure(); "
    "print(os.environ.get('XLA_FLAGS', ''))"
)


def _flags_after_configure(**env) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    environment.pop("FCN_JAX_KEEP_YNN_FUSIONS", None)
    environment.update(env)
    result = subprocess.run(
        [sys.executable, "-c", SNIPPET],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
    )
    return result.stdout.strip()


def test_ynn_fusions_are_turned_off_by_default():
    assert _flags_after_configure() == "--xla_cpu_experimental_ynn_fusion_type="


def test_a_user_choice_is_kept():
    chosen = "--xla_cpu_experimental_ynn_fusion_type=conv --xla_dump_to=/tmp/x"
    assert _flags_after_configure(XLA_FLAGS=chosen) == chosen
    assert _flags_after_configure(FCN_JAX_KEEP_YNN_FUSIONS="1") == ""


def test_other_user_flags_are_kept_alongside():
    flags = _flags_after_configure(XLA_FLAGS="--xla_dump_to=/tmp/x")
    assert flags.split() == [
        "--xla_dump_to=/tmp/x",
        "--xla_cpu_experimental_ynn_fusion_type=",
    ]
