"""The ``ctd-monitor`` commands, one module per job; ``ctd_monitor.cli`` registers them on one typer app."""
