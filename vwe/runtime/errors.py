"""Every exception vwe raises for bad input, in one place. The CLI prints them without a traceback and
exits with code 2."""


class VweError(Exception):
    """Bad input from the user: a config, a path, a data file, a checkpoint. The message says which."""


class DataError(VweError):
    """A data folder, shard or sample is missing or corrupt; the message names the file and sample key."""


class CheckpointError(VweError):
    """A checkpoint or weights file is missing, incomplete or of another model shape."""


class ConfigError(VweError):
    """A config file or override is invalid; the message names the key and where it came from."""


class WriteError(VweError):
    """An output could not be written (read-only or full file system, permissions)."""


class RunLocked(VweError):
    """Another process writes into this run directory."""


class ConfigDrift(VweError):
    """The config differs from the checkpoint's in keys that change what training computes."""


class NonFinite(VweError):
    """A loss, parameter or buffer became NaN or Inf; the last good checkpoint is kept."""


class SegmentationWeightsError(CheckpointError):
    """Weights trained with segmentation masks offered as the initialisation of a WSSS network."""


class WeightsImportError(CheckpointError):
    """An authors' weights file does not fit the network it is said to hold."""


def problem_list(head: str, problems: list[str], limit: int) -> str:
    """`head`, then the first `limit` problems one per line, then how many more there are."""
    more = f"\n  ... ({len(problems) - limit} more)" if len(problems) > limit else ""
    return f"{head}:\n  " + "\n  ".join(problems[:limit]) + more


def id_listing(ids: list[str], limit: int) -> str:
    """The first `limit` ids (sorted), then how many more there are."""
    shown = ", ".join(sorted(ids)[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")
