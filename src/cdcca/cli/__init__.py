"""The ``cdcca`` command line (``main``) and its sub-command modules."""
