"""Where the tests find the shared data: ``../shared`` beside the repository root."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MOVIELENS_DIR = SHARED / "data" / "ml-latest-small"
MOVIELENS_RATINGS = MOVIELENS_DIR / "ratings.csv"
