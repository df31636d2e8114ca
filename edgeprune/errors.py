"""User-facing errors: one sentence naming the input at fault and what to do."""


class EdgepruneError(Exception):
    """An error caused by the user's input or environment; the CLI prints it without a traceback."""


class BudgetNotMet(EdgepruneError):
    """The search ended without a candidate within the target's budget."""


class RuntimeCrash(EdgepruneError):
    """A native runtime (llama.cpp) died in its child process: a signal, or an exit without a Python error."""
