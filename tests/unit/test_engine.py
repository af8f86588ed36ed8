import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from mlsd_ray.core.errors import InputError
from mlsd_ray.tasks.image.data.transforms import Preprocessor
from mlsd_ray.tasks.image.engine import Step, evaluate, train_one_epoch
from mlsd_ray.tasks.image.models import build_model
from mlsd_ray.training.loop import NonFiniteLossError


def digit_batches(images, labels, size=64):
    return [{"image": images[i:i + size], "label": labels[i:i + size]}
            for i in range(0, len(images), size)]


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = np.rint(data.images * 255 / 16).astype(np.uint8)[..., None]
    return images[:1400], data.target[:1400], images[1400:], data.target[1400:]


def test_seed_cnn_learns_digits_in_a_few_epochs(digits):
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits
    pre = Preprocessor(8, 1, [x_train.mean() / 255], [(x_train / 255).std()])
    step = Step(pre, torch.device("cpu"))
    model = build_model("seed_cnn", 1, 8, 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = evaluate(model, digit_batches(x_test, y_test), step)
    for _ in range(6):
        result = train_one_epoch(model, digit_batches(x_train, y_train), optimizer, step)
    after = evaluate(model, digit_batches(x_test, y_test), step, keep_predictions=True)
    assert result.samples == 1400
    assert before.accuracy < 0.3 and after.accuracy > 0.9
    assert len(after.predictions) == len(y_test)


def test_nan_loss_stops_training(digits):
    x_train, y_train, _, _ = digits
    step = Step(Preprocessor(8, 1, [0.3], [0.4]), torch.device("cpu"))
    model = build_model("seed_cnn", 1, 8, 10)
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError):
        train_one_epoch(model, digit_batches(x_train, y_train), optimizer, step)


def test_unknown_model_and_too_small_input():
    with pytest.raises(InputError, match="unknown model 'vgg'.*resnet18.*seed_cnn"):
        build_model("vgg", 1, 8, 10)
    with pytest.raises(InputError, match="at least 4"):
        build_model("seed_cnn", 1, 3, 10)


@pytest.mark.parametrize("name", ["seed_cnn", "resnet18"])
def test_models_fit_the_input_shape(name):
    model = build_model(name, 3, 16, 7)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 7)
