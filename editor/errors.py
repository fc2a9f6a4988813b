"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class EditorError(Exception):
    """A user-facing error: bad recipe, bad data, unsupported model, integrity failure..."""


class VerificationError(EditorError):
    """A checkpoint whose files fail verification (a sha256 mismatch, a missing or unlisted file, patch
    tensors that differ from their digest): the CLI exits 1 — ``inspect``'s verdict, and every
    command's refusal of such a checkpoint — where every other error exits 2."""
