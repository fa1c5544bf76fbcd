"""`moejax-train` with its workdir writes recorded: the CLI as the harness runs it.

  python -m tests.multihost.audited_cli --config ... --workdir ...

With `MOEJAX_AUDIT_LOG` and `MOEJAX_AUDIT_PREFIX` set, every Python-level write
under the prefix is recorded (`tests.multihost.audit`) before `moejax.cli.main`
runs; without them this is exactly `moejax-train`.
"""

import os

from tests.multihost import audit

if __name__ == "__main__":
  if os.environ.get("MOEJAX_AUDIT_LOG"):
    audit.install(os.environ["MOEJAX_AUDIT_LOG"], os.environ["MOEJAX_AUDIT_PREFIX"])
  from moejax.cli import main  # pylint: disable=g-import-not-at-top
  main()
