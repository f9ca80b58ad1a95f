"""Whether prod-st shows progress bars: `prod-st run --no-progress` turns them off (log files, CI). Read where a
bar is made; the Hugging Face libraries' own bars follow their environment variables (set by the CLI too)."""

ENABLED = True


def enabled(progress: bool = True) -> bool:
    """`progress` (a caller's own wish) unless bars are off for the whole process."""
    return progress and ENABLED
