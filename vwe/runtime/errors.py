"""Exceptions for bad input. The CLI prints them without a traceback and exits with code 2."""


class VweError(Exception):
    """Bad input from the user: a config, a path, a data file, a checkpoint. The message says which."""


class DataError(VweError):
    """A data folder, shard or sample is missing or corrupt; the message names the file and sample key."""


class CheckpointError(VweError):
    """A checkpoint or weights file is missing, incomplete or of another model shape."""


def problem_list(head: str, problems: list[str], limit: int) -> str:
    """`head`, then the first `limit` problems one per line, then how many more there are."""
    more = f"\n  ... ({len(problems) - limit} more)" if len(problems) > limit else ""
    return f"{head}:\n  " + "\n  ".join(problems[:limit]) + more


def id_listing(ids: list[str], limit: int) -> str:
    """The first `limit` ids (sorted), then how many more there are."""
    shown = ", ".join(sorted(ids)[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")
