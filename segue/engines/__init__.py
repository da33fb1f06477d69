"""Engines behind one interface (`segue.engines.base.Engine`); `registry` has the table of
them and builds the one a worker runs."""
