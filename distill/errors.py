"""The ways a `distill` job stops on purpose. Anything else that escapes is a bug in distill and keeps
its traceback, so that it is never shown to a user as their mistake."""


class UserError(ValueError):
    """Something the user can fix (a path, a recipe value, data, a vocabulary, a damaged checkpoint).

    The message says what was wrong and how to fix it; the CLI prints it as one line and exits with
    code 2. A ValueError, so that library callers who catch ValueError keep working.
    """


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite value. The message names the step and the side (teacher
    logits, student logits, the loss or the gradients); the run stops there, writes no model, and the
    CLI exits with code 1. Checkpoints written before that step are left as they were."""


class ServerError(RuntimeError):
    """A vLLM server the run depends on (``teacher_server``, or the student's with ``use_vllm``)
    stopped answering, or answered something that is not what vLLM sends. Raised after the retries
    are spent (or at once for a malformed answer, which retrying would not fix); the message says how
    to resume, and the CLI exits with code 1. Checkpoints written before are left as they were."""
