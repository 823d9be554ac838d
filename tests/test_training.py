"""End to end: an MLP on real handwritten digits trains in 8-bit fixed point."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import nics_fix as nf


def digits():
    data = load_digits()
    x = (data.images / 16.0).reshape(-1, 64).astype(np.float32)
    return train_test_split(x, data.target, test_size=0.25, random_state=0, stratify=data.target)


def train_mlp(fixed_cfg, epochs=30):
    x_train, x_test, y_train, y_test = digits()
    keras.utils.set_random_seed(0)
    with nf.fixed_scope("mlp", fixed_cfg):
        model = keras.Sequential([
            keras.Input((64,)),
            nf.Dense(64, name="dense1"), nf.ReLU(name="relu1"),
            nf.Dense(64, name="dense2"), nf.ReLU(name="relu2"),
            nf.Dense(10, name="logits"),
        ])
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
    return model, model.evaluate(x_test, y_test, verbose=0)[1]


@pytest.mark.slow
def test_8bit_mlp_on_digits_within_two_points_of_float(fix8):
    _, float_acc = train_mlp(None)
    model, fixed_acc = train_mlp({"by_type": {"Dense": fix8, "ReLU": {"activation": fix8["activation"]}}})
    print(f"digits MLP test accuracy: float {float_acc:.4f}, 8-bit (W/A/G/E) {fixed_acc:.4f}")
    assert float_acc > 0.94
    assert fixed_acc >= float_acc - 0.02
    # It really was quantized: every kernel point has a scale and 8 bits.
    kernels = [p for p in nf.fixed_points(model) if p.variable == "kernel"]
    assert len(kernels) == 3 and all(p.data_config["bit_width"] == 8 for p in kernels)
