"""Flag parsing shared by the command-line tools (`train.py`, `python -m udajax.evaluate`,
`python -m udajax.predict`): a bad flag, config file or `--config.*` override is reported as one
`error: ...` line with exit status 2 instead of a traceback or absl's usage dump.

Light: absl, ml_collections and `udajax.configuration` only (no jax, no TensorFlow).
"""

import difflib
import sys

from absl import flags


def fail(message: str) -> None:
  """Prints `error: <message>` as one line on stderr and exits with status 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def _flag_error(argv, e) -> str:
  """One line for a command-line parse failure, naming an unknown `--config.*` key if any."""
  from udajax import configuration
  schema = configuration.base_config()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    node, done = schema, []
    for key in path:
      if not hasattr(node, "keys") or key not in node:
        known = list(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean '{'.'.join(done + close)}'? " if close else ""
        where = ".".join(done) or "the top level"
        return (f"config key '{'.'.join(path)}' is unknown ({arg}): {hint}"
                f"known keys of {where}: {', '.join(sorted(known))}")
      node, done = node[key], done + [key]
  text = " ".join(str(e).replace("\\n", " ").split())
  if "cannot be added since the config is locked" in text:  # a typo inside the config file
    files = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    return f"cannot load config file {files[0] if files else '?'} ({type(e).__name__}): {text}"
  return f"bad command line ({type(e).__name__}): {text}; see --help"


def parse_flags(argv):
  """absl flag parsing (`app.run(main, flags_parser=parse_flags)`) for a tool with a `--config`
  config-file flag: any parse or config-file load failure is one error line (exit status 2)."""
  try:
    args = flags.FLAGS(argv)
  except Exception as e:  # absl / ml_collections raise several types (AttributeError, KeyError...)
    if "--config must have a value" in str(e):
      fail("--config is required, e.g. --config=configs/demo.py")
    fail(_flag_error(argv, e))
  try:
    flags.FLAGS["config"].value.keys()  # ml_collections defers a config file's load error
  except Exception as e:
    cause = e.__cause__ or e
    fail(f"cannot load config file {flags.FLAGS['config'].config_filename} "
         f"({type(cause).__name__}: {cause}): check the path and that it defines get_config()")
  return args
