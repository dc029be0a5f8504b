"""Everything Ray: placement, remote experts, recovery, the job entry point, the CLI, the harness."""
