"""The `prod-st` command line (Typer). Installed as the package `prod_st_cli`; its source lives in cli/."""
