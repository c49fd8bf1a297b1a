"""`python -m ctxext` (also what `accelerate launch -m ctxext` runs)."""

from ctxext.cli.app import main

if __name__ == "__main__":
    main()
