"""``python -m bntool`` (also what ``torchrun -m bntool`` runs)."""

from .cli import main

if __name__ == "__main__":
    main()
