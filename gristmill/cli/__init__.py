"""Every subcommand's argument parsing and printing (the ``gristmill`` command)."""
