"""Random-access sources of examples from our own TFDS builders or the catalogue."""

import contextlib
import fcntl
import inspect
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds


def builders() -> dict[str, type[tfds.core.DatasetBuilder]]:
    """Our own builders by TFDS name; other names go to the TFDS catalogue."""
    # Imported here, not at the top: the builder modules import this one.
    from fcn_jax.data import camvid, isbi2012

    return {
        builder.name: builder for builder in (isbi2012.Isbi2012Membrane, camvid.Camvid)
    }


def default_data_dir() -> pathlib.Path:
    """`$FCN_JAX_DATA_DIR`, else `~/.cache/fcn_jax/tensorflow_datasets`."""
    if env := os.environ.get("FCN_JAX_DATA_DIR"):
        return pathlib.Path(env)
    return pathlib.Path.home() / ".cache" / "fcn_jax" / "tensorflow_datasets"


def load_data_source(
    name: str = "isbi2012_membrane",
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    manual_dir: str | os.PathLike | None = None,
) -> Sequence[dict[str, Any]]:
    """A random-access source of examples of `split`, e.g. for ISBI
    `{'image': uint8 [512, 512, 1], 'label': uint8 [512, 512, 1], 'id': int32}`.

    Our own builders are prepared (array_record) on first use; other names are
    handed to `tfds.data_source`. With several processes on one host, a file
    lock lets one prepare while the others wait. `manual_dir` is the folder of
    raw files for builders that read one (CamVid; it defaults to that
    builder's environment variable). It is only read while preparing: once
    prepared, `data_dir` alone finds the data.
    """
    data_dir = pathlib.Path(data_dir or default_data_dir()).expanduser()
    registry = builders()
    if name not in registry:
        if manual_dir is not None:
            raise ValueError(f"manual_dir is only read by {sorted(registry)}.")
        if not data_dir.is_dir():
            raise FileNotFoundError(f"TFDS data directory {data_dir} does not exist.")
        return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir))
    kwargs = {"data_dir": os.fspath(data_dir), "file_format": "array_record"}
    if manual_dir is not None:
        if "manual_dir" not in inspect.signature(registry[name]).parameters:
            raise ValueError(f"Data set {name} takes no manual_dir.")
        kwargs["manual_dir"] = os.fspath(manual_dir)
    builder = registry[name](**kwargs)
    if not builder.is_prepared():
        with _lock(data_dir, name):
            builder = registry[name](**kwargs)
            if not builder.is_prepared():
                builder.download_and_prepare(file_format="array_record")
    return builder.as_data_source(split=split)


@contextlib.contextmanager
def _lock(data_dir: pathlib.Path, name: str) -> Iterator[None]:
    """Holds an exclusive lock on `data_dir/name.lock`, creating `data_dir`."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(data_dir / f"{name}.lock", "w")  # noqa: SIM115
    except OSError as error:
        raise OSError(
            f"Cannot prepare {name} in data directory {data_dir}: {error}. "
            "Set FCN_JAX_DATA_DIR or pass data_dir to a writable directory."
        ) from error
    with lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
