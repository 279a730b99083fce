"""Errors caused by user input (config, data file, checkpoint, model folder).

The CLI prints these as one line, `error: <message>`, and exits with status 2; the message
names the field, file and line or tensor. Anything else is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
  """Bad input from the user; the message must say where (field, file:line, tensor)."""


class TrainingHalted(RuntimeError):
  """The run stopped itself cleanly (e.g. repeated non-finite losses); checkpoints are intact.
  The CLI prints the message as one line and exits with status 3."""


class ConfigError(UserInputError):
  """A bad run config: a field's value, a config file, or a `--config.a.b=v` override."""
