"""``python -m taskgrouping``: the command-line interface (also what ``torchrun -m taskgrouping`` runs)."""

from taskgrouping.cli import main

if __name__ == "__main__":
    main()
