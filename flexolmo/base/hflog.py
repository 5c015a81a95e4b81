"""transformers' console output: one switch for the CLI, benches and tests.

Light on purpose (only `transformers.utils.logging`): the CLI calls it at start-up.
"""


def quiet_transformers() -> None:
    """No progress bars or load/save reports from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
