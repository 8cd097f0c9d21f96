"""The gate's checks of a model's outputs before and while it computes accuracy: exactly one output of class
scores, shape (N, classes), finite, and the top-1 accuracy from them. Read by `flexslim.deploy.gate`; the contract
is in its docstring.
"""

from __future__ import annotations

from flexslim.errors import BadInput


def _shape_text(dims) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def _check_declared_output(proto, path, class_names: list[str]) -> None:
    """Before any accuracy: the graph declares exactly one output, of shape (N, classes) where the graph says."""
    outputs = list(proto.graph.output)
    if len(outputs) != 1:
        raise BadInput(
            f"{path} has {len(outputs)} outputs ({', '.join(o.name for o in outputs)}); the gate computes accuracy "
            "only from exactly one output of class scores, shape (N, classes)"
        )
    t = outputs[0].type.tensor_type
    if not t.HasField("shape"):
        return  # checked on the scores themselves
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    _check_scores_shape(dims, path, len(class_names) or None, "declares an output of shape")


def _check_scores_shape(dims, path, classes: int | None, what: str) -> None:
    if len(dims) != 2 or (classes is not None and isinstance(dims[1], int) and dims[1] != classes):
        need = f"(N, {classes})" if classes is not None else "(N, classes)"
        raise BadInput(
            f"{path} {what} {_shape_text(dims)}; accuracy needs class scores of shape {need} "
            "(flatten the head, e.g. torch.flatten(x, 1), and give one score per class)"
        )


def _scores(outputs: list, rows: int, classes: int | None, path):
    """The model's class scores for one batch: exactly one finite array of shape (rows, classes), else BadInput."""
    import numpy as np

    if len(outputs) != 1:
        raise BadInput(f"{path} gives {len(outputs)} outputs; accuracy needs exactly one, class scores (N, classes)")
    scores = np.asarray(outputs[0])
    _check_scores_shape(list(scores.shape), path, classes, "gives class scores of shape")
    if scores.shape[0] != rows:
        raise BadInput(f"{path} gives scores of shape {_shape_text(scores.shape)} for a batch of {rows} images")
    if not np.issubdtype(scores.dtype, np.floating) or not np.isfinite(scores).all():
        raise BadInput(
            f"{path} gives non-finite class scores (NaN or inf, shape {_shape_text(scores.shape)}, {scores.dtype}); "
            "a model that scores NaN has no accuracy: fix the model"
        )
    return scores


def _accuracy(session, dataset: str, data_dir, input_shape, fixed_batch, class_names=(), model="model"):
    """Top-1 accuracy on the dataset's test split, images in [0, 1] resized to the model's H, W if needed.

    The scores are checked on every batch (one finite (N, classes) output; classes = the dataset's class count and
    the model's `class_names`, which must agree). `folder`: the images under --data (a split of class folders, or a
    root with val/), labelled by `class_names`.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from flexslim.data.sources import load_dataset
    from flexslim.recipe.schema import DataConfig

    _, c, h, w = input_shape
    step = fixed_batch or 256
    classes = len(class_names) or None
    if dataset == "folder":  # streamed: a validation folder need not fit in memory
        from flexslim.data.folders import eval_folder_batches

        batches = eval_folder_batches(data_dir, h, c, class_names, batch_size=step)
    else:
        ds = load_dataset(DataConfig(dataset=dataset, image_size=h), data_dir)
        if ds.input_shape[0] != c:
            raise BadInput(f"the model takes {c}-channel images but {dataset} has {ds.input_shape[0]}")
        if classes is not None and classes != ds.num_classes:
            raise BadInput(
                f"model metadata flexslim.class_names names {classes} classes but {dataset} has {ds.num_classes}; "
                "pass the --dataset the model was trained on"
            )
        classes = ds.num_classes
        batches = ds.test_batches(step)
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in batches:
        if x.shape[2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        n = len(x)
        if fixed_batch and n < fixed_batch:
            x = torch.cat([x, x.new_zeros(fixed_batch - n, *x.shape[1:])])
        outputs = session.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        scores = _scores(outputs, len(x), classes, model)[:n]
        labels = y.numpy()
        if classes is None and labels.size and int(labels.max()) >= scores.shape[1]:
            raise BadInput(f"{model} gives {scores.shape[1]} class scores but the data has label {int(labels.max())}")
        correct += int((scores.argmax(1) == labels).sum())
        total += n
    if total == 0:
        raise BadInput(f"the {dataset} test split has no images; point --data at a split with images")
    return correct / total, total
