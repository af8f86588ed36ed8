"""The image task's `mlsd explain`: Captum's Integrated Gradients and Grad-CAM (on the last
rectified feature maps) for the predicted class, drawn over each input, with the sanity checks of
mlsd_ray/explain (model randomisation, deletion).

Attributions are taken on the pixels in [0, 1] at the trained size, through the same
normalisation, network and softmax that serving runs (export.py's NormalizedClassifier). The
baseline of Integrated Gradients, and what a deleted pixel becomes, is 0 (black).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import torch
from torch import nn

from mlsd_ray import explain
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.explain import ExplanationResult, SanityChecks
from mlsd_ray.tasks.image.checkpoint import LoadedModel
from mlsd_ray.tasks.image.export import NormalizedClassifier

METHODS = ("integrated_gradients", "grad_cam")
IG_STEPS = 32
SEED = 0  # the random deletion order
RANDOM_WEIGHTS_SEED = 20181011  # not a seed training uses (Adebayo et al. 2018, arXiv 1810.03292)


def feature_layer(model: nn.Module, pixels: torch.Tensor) -> nn.Module:
    """Where Grad-CAM looks: the module that last produces spatial feature maps (N×C×H×W,
    H·W > 1) in a forward pass, pooling aside: the rectified output of the last convolution
    (seed_cnn's ReLU after its second conv, resnet18's last block). On the convolution itself,
    before its ReLU, a trained seed_cnn's maps were negative everywhere and came out blank."""
    produced: list[nn.Module] = []

    def note(module: nn.Module, args, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and \
                output.shape[2] * output.shape[3] > 1:
            produced.append(module)

    pooling = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    hooks = [m.register_forward_hook(note) for m in model.modules()
             if m is not model and not isinstance(m, pooling)]
    try:
        with torch.no_grad():
            model(pixels[:1])
    finally:
        for hook in hooks:
            hook.remove()
    if not produced:
        raise InputError("Grad-CAM needs spatial feature maps; this network has none")
    return produced[-1]


def explainable(loaded: LoadedModel) -> NormalizedClassifier:
    """The served computation with out-of-place activations: an in-place ReLU after the last
    convolution overwrites the output Grad-CAM hooks (its maps of a trained seed_cnn came out
    all zero)."""
    classifier = copy.deepcopy(NormalizedClassifier(loaded)).eval()
    for module in classifier.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return classifier


def attribute(classifier: NormalizedClassifier, pixels: torch.Tensor,
              targets: torch.Tensor) -> dict[str, np.ndarray]:
    """Each method's attributions for `targets`: N×C×H×W (Grad-CAM's: N×1×H×W, upsampled).
    Integrated Gradients explains the probability (its path integral does not saturate)."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    integrated = IntegratedGradients(classifier).attribute(
        pixels, baselines=torch.zeros_like(pixels), target=targets, n_steps=IG_STEPS,
        internal_batch_size=256)
    # On the class score, as Grad-CAM is defined: a confident softmax is 1.0 in float32, and
    # its gradient 0, which made every map of a trained model blank.
    layer = feature_layer(classifier.model, classifier.normalize(pixels.detach()))
    cam = LayerGradCam(classifier.logits, layer).attribute(pixels, targets,
                                                           relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, tuple(pixels.shape[2:]), "bilinear")
    return {"integrated_gradients": integrated.detach().numpy(),
            "grad_cam": cam.detach().numpy()}


def randomised(classifier: NormalizedClassifier) -> NormalizedClassifier:
    """The same architecture and normalisation with freshly initialised weights."""
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    twin = copy.deepcopy(classifier)
    for module in twin.model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return twin.eval()


def explain_pixels(classifier: NormalizedClassifier, pixels: torch.Tensor, names: list[str],
                   class_index: int | None) -> list[dict]:
    """What POST /v1/explain answers per image: the predicted class, the class explained (the
    predicted one, or `class_index`), its probability, and each method's map (H×W, summed over
    channels). `pixels`: N×C×H×W in [0, 1] at the trained size."""
    with torch.no_grad():
        probabilities = classifier(pixels).numpy()
    predicted = probabilities.argmax(1)
    targets = predicted if class_index is None else np.full(len(pixels), class_index)
    maps = attribute(classifier, pixels.clone().requires_grad_(True), torch.from_numpy(targets))
    return [{"predicted": names[int(predicted[i])], "explained": names[int(targets[i])],
             "class_index": int(targets[i]),
             "probability": round(float(probabilities[i, targets[i]]), 5),
             **{method: np.round(maps[method][i].sum(axis=0), 5).tolist()
                for method in METHODS}}
            for i in range(len(pixels))]


def explain_images(loaded: LoadedModel, images: np.ndarray, labels: list[str],
                   sources: list[str], out: str) -> ExplanationResult:
    """Explain each uint8 image (N×H×W×C at the trained size) for its predicted class; write
    overlays/, the two sanity figures and explanations.json into `out`."""
    classifier = explainable(loaded)
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        probabilities = classifier(pixels).numpy()
    targets = torch.from_numpy(probabilities.argmax(1))
    maps = attribute(classifier, pixels.clone().requires_grad_(True), targets)
    random_maps = attribute(randomised(classifier), pixels.clone().requires_grad_(True),
                            targets)
    sanity, curves = _sanity(classifier, pixels.numpy(), targets.numpy(), maps, random_maps)
    names = loaded.preprocessor.class_names
    overlays = [_write_overlay(out, i, images[i], labels[i], names[int(targets[i])],
                               float(probabilities[i, targets[i]]),
                               {m: maps[m][i] for m in METHODS}) for i in range(len(images))]
    figures = [explain.write_output(out, "sanity-randomisation.png",
                      _randomisation_figure(images, maps, random_maps, sanity)),
               explain.write_output(out, "sanity-deletion.png", _deletion_figure(curves))]
    records = [{"source": sources[i], "label": labels[i],
                "predicted": names[int(targets[i])],
                "probability": round(float(probabilities[i, targets[i]]), 4),
                "overlay": overlays[i],
                "top_pixels": _top_pixels(maps["integrated_gradients"][i])}
               for i in range(len(images))]
    json_file = explain.write_output(out, "explanations.json", json.dumps(
        {"methods": list(METHODS), "explanations": records, "sanity": sanity.to_dict()},
        indent=2).encode())
    return ExplanationResult(out=out, explained=len(images), overlays=overlays,
                             figures=figures, json_file=json_file, sanity=sanity)


def class_attribution_png(loaded: LoadedModel, images: np.ndarray, labels: np.ndarray,
                          per_class: int = 10) -> bytes:
    """The mean |Integrated Gradients| map of each class's first `per_class` images, for the
    true class: where the model looks for each class (the evaluation report's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = loaded.preprocessor.class_names
    classifier = explainable(loaded)
    figure, axes = plt.subplots(1, len(names), figsize=(1.2 * len(names) + 0.5, 1.7),
                                squeeze=False)
    for index, (axis, name) in enumerate(zip(axes[0], names)):
        rows = np.flatnonzero(labels == index)[:per_class]
        axis.axis("off")
        axis.set_title(name, fontsize=8)
        if not len(rows):
            continue
        pixels = torch.from_numpy(np.ascontiguousarray(images[rows])).permute(0, 3, 1, 2)
        pixels = (pixels.float() / 255).requires_grad_(True)
        maps = attribute(classifier, pixels, torch.full((len(rows),), index))
        axis.imshow(_heat(maps["integrated_gradients"].mean(axis=0)), cmap="inferno")
    figure.suptitle("mean |integrated gradients| per class (true class)", fontsize=8)
    return explain.figure_png(figure)


def _sanity(classifier: NormalizedClassifier, pixels: np.ndarray, targets: np.ndarray,
            maps: dict[str, np.ndarray],
            random_maps: dict[str, np.ndarray]) -> tuple[SanityChecks, dict[str, np.ndarray]]:
    def probability(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return classifier(torch.from_numpy(batch)).numpy()

    rng = np.random.default_rng(SEED)
    pixels_per_image = pixels.shape[2] * pixels.shape[3]
    shuffled = np.stack([rng.permutation(pixels_per_image) for _ in range(len(pixels))])
    curves = {method: explain.deletion_curve(probability, pixels,
                                             explain.deletion_order(maps[method]), targets)
              for method in METHODS}
    curves["random"] = explain.deletion_curve(probability, pixels, shuffled, targets)
    checks = SanityChecks(
        randomised_correlation={m: round(explain.rank_correlation(maps[m], random_maps[m]), 4)
                                for m in METHODS},
        deletion_auc={m: round(float(curves[m].mean()), 4) for m in METHODS},
        random_deletion_auc=round(float(curves["random"].mean()), 4))
    return checks, curves


def _top_pixels(attribution: np.ndarray, count: int = 5) -> list[dict]:
    """The most attributed pixels (row, column, attribution summed over channels)."""
    per_pixel = attribution.sum(axis=0)
    order = np.argsort(-np.abs(per_pixel), axis=None)[:count]
    return [{"row": int(r), "column": int(c), "attribution": round(float(per_pixel[r, c]), 5)}
            for r, c in zip(*np.unravel_index(order, per_pixel.shape))]


def _heat(attribution: np.ndarray) -> np.ndarray:
    """|attribution| summed over channels, scaled to [0, 1] for drawing."""
    heat = np.abs(attribution).sum(axis=0)
    return heat / heat.max() if heat.max() > 0 else heat


def _shown(image: np.ndarray):
    return (image[:, :, 0], "gray") if image.shape[2] == 1 else (image, None)


def _write_overlay(out: str, index: int, image: np.ndarray, label: str, predicted: str,
                   probability: float, maps: dict[str, np.ndarray]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    shown, cmap = _shown(image)
    axes[0].imshow(shown, cmap=cmap)
    axes[0].set_title(f"label {label or '?'}\npredicted {predicted} ({probability:.2f})",
                      fontsize=8)
    for axis, method in zip(axes[1:], METHODS):
        axis.imshow(shown, cmap=cmap)
        axis.imshow(_heat(maps[method]), cmap="inferno", alpha=0.6)
        axis.set_title(method.replace("_", " "), fontsize=8)
    for axis in axes:
        axis.axis("off")
    name = f"overlays/{index:03d}-label-{label or 'none'}-predicted-{predicted}.png"
    return explain.write_output(out, name, explain.figure_png(figure))


def _randomisation_figure(images: np.ndarray, maps: dict, random_maps: dict,
                          sanity: SanityChecks) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(4, len(images))
    figure, axes = plt.subplots(shown, 5, figsize=(9, 1.9 * shown + 0.6), squeeze=False)
    columns = ["input", "IG trained", "IG random weights", "Grad-CAM trained",
               "Grad-CAM random weights"]
    for row in range(shown):
        image, cmap = _shown(images[row])
        panels = [None, maps["integrated_gradients"][row],
                  random_maps["integrated_gradients"][row], maps["grad_cam"][row],
                  random_maps["grad_cam"][row]]
        for column, panel in enumerate(panels):
            axis = axes[row][column]
            axis.imshow(image if panel is None else _heat(panel),
                        cmap=cmap if panel is None else "inferno")
            axis.axis("off")
            if row == 0:
                axis.set_title(columns[column], fontsize=8)
    rho = sanity.randomised_correlation
    figure.suptitle(f"model randomisation: rank correlation IG {rho['integrated_gradients']:.2f},"
                    f" Grad-CAM {rho['grad_cam']:.2f} (low: the maps depend on the weights)",
                    fontsize=8)
    return explain.figure_png(figure)


def _deletion_figure(curves: dict[str, np.ndarray]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 3.2))
    fractions = np.linspace(0, 1, explain.DELETION_STEPS)
    for name, curve in curves.items():
        axis.plot(fractions, curve.mean(axis=0),
                  label=f"{name.replace('_', ' ')} (AUC {curve.mean():.3f})",
                  linestyle="--" if name == "random" else "-")
    axis.set_xlabel("fraction of pixels deleted (most attributed first)")
    axis.set_ylabel("probability of the predicted class")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return explain.figure_png(figure)




def explain_checkpoint(checkpoint_dir: str, source: str | None, label: str | None, count: int,
                       out: str | None, workspace: Workspace) -> ExplanationResult:
    """Explain `count` inputs for the model in `checkpoint_dir`: from its own test split, or
    from `source` (a --source SPEC, read and decoded as `mlsd predict` does); with `label`,
    only inputs of that class."""
    import time

    from mlsd_ray.tasks.image.checkpoint import load_model

    loaded = load_model(checkpoint_dir)
    names = loaded.preprocessor.class_names
    if label is not None and label not in names:
        raise InputError(f"--label {label!r}: the model's classes are {', '.join(names)}")
    images, labels, sources = (_from_source(loaded, source, label, count, workspace) if source
                               else _from_test_split(loaded, label, count))
    if not len(images):
        raise InputError(f"no input{' labelled ' + repr(label) if label else ''} to explain in "
                         f"{source or 'the test split'}")
    out = out or workspace.explanations(loaded.metadata.run_name,
                                                 time.strftime("%Y%m%d-%H%M%S"))
    return explain_images(loaded, images, labels, sources, out)


def _from_test_split(loaded: LoadedModel, label: str | None,
                     count: int) -> tuple[np.ndarray, list[str], list[str]]:
    from mlsd_ray.tasks.image.data.prepare import PreparedDataset

    images, labels = PreparedDataset.open(loaded.metadata.dataset.path).load_split("test")
    names = loaded.preprocessor.class_names
    rows = [i for i, y in enumerate(labels) if label is None or names[int(y)] == label][:count]
    return (images[rows], [names[int(labels[i])] for i in rows],
            [f"test split row {i}" for i in rows])


def _from_source(loaded: LoadedModel, spec: str, label: str | None, count: int,
                 workspace: Workspace) -> tuple[np.ndarray, list[str], list[str]]:
    import functools

    from mlsd_ray.core.runtime import ensure_ray
    from mlsd_ray.tasks.image.batch import OK, decode_rows
    from mlsd_ray.tasks.image.config import ImageConfig
    from mlsd_ray.tasks.image.data.sources import parse_source

    cfg = ImageConfig()
    source = parse_source(spec, cfg.data, workspace)
    source.class_names()  # a missing path fails here, before Ray starts
    ensure_ray(workspace)
    pre = loaded.preprocessor
    decode = functools.partial(decode_rows, size=pre.image_size, channels=pre.channels,
                               pixel_range=cfg.data.pixel_range)
    rows = source.read(then=decode).filter(
        lambda row: row["status"] == OK and (label is None or row["label_name"] == label)
    ).take(count)
    if not rows:
        return np.zeros((0, pre.image_size, pre.image_size, pre.channels), np.uint8), [], []
    return (np.stack([row["image"] for row in rows]), [row["label_name"] for row in rows],
            [str(row["source"]) for row in rows])
