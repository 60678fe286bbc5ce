"""The rehearsal's tooling: offline stand-ins of every Hub source the full profile reads (``standins``), built by
``scripts/make_standins.py`` and used by ``scripts/rehearse.py`` and the tests. Not part of the installed package:
a learner never needs it."""
