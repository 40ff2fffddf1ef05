"""`simscale eval knn`: the k-NN probe of an exported encoder (the classifier is simscale/knn.py)."""
from __future__ import annotations

from simscale.knn import knn_predict, knn_top1  # noqa: F401 - the probe's classifier, importable from here


def cli_main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from simscale.eval.features import encode_splits

    (train_f, train_y), (val_f, val_y), n_classes = encode_splits(args)
    top1 = knn_top1(train_f, train_y, val_f, val_y, args.k, args.temperature, n_classes)
    what = f"raw pixels at {args.img_size} px" if getattr(args, "pixels", False) else args.model
    table = Table(title=f"k-NN probe: {what}")
    for col in ("k", "T", "top-1 (%)", "n_train", "n_val", "classes"):
        table.add_column(col, justify="right")
    table.add_row(str(args.k), f"{args.temperature:g}", f"{100 * top1:.2f}", str(len(train_f)),
                  str(len(val_f)), str(n_classes))
    Console().print(table)
    return 0
