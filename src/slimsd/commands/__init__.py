"""The CLI's sub-commands: click wrappers only; the work happens in the modules they import."""
