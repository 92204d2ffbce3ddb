"""Train a small convolutional network on scikit-learn's bundled 8x8 digits (no download needed).

In the spirit of the Azure ML custom-Docker tutorial's pets CNN, but sized for a laptop CPU:
conv 3x3 (8 filters) -> ReLU -> max-pool 2x2 -> dense -> softmax, written in NumPy so the only
dependencies are numpy and scikit-learn. Logs loss and accuracy per epoch through dockyard's run
context when it runs under dockyard (plain prints otherwise) and saves the model to outputs/.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def run_context():
    """dockyard's in-run logger when available; a printing stand-in otherwise."""
    try:
        from dockyard import Run  # type: ignore[attr-defined]

        return Run.get_context()
    except (ImportError, AttributeError):

        class _Printer:
            def log(self, name: str, value: float) -> None:
                print(f"{name}: {value:.4f}")

        return _Printer()


def windows(x: np.ndarray) -> np.ndarray:
    """(N, 8, 8) images -> (N, 64, 9) 3x3 neighbourhoods with zero padding (im2col)."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    view = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    return view.reshape(x.shape[0], 64, 9)


class SmallCNN:
    def __init__(self, rng: np.random.Generator, filters: int = 8) -> None:
        self.w1 = rng.normal(0, np.sqrt(2 / 9), (9, filters))
        self.b1 = np.zeros(filters)
        self.w2 = rng.normal(0, np.sqrt(2 / (16 * filters)), (16 * filters, 10))
        self.b2 = np.zeros(10)
        self.filters = filters
        self.velocity = [np.zeros_like(p) for p in self.params]

    @property
    def params(self) -> list[np.ndarray]:
        return [self.w1, self.b1, self.w2, self.b2]

    def forward(self, x: np.ndarray):
        n, f = x.shape[0], self.filters
        cols = windows(x)
        z = cols @ self.w1 + self.b1  # (N, 64, F)
        a = np.maximum(z, 0).reshape(n, 4, 2, 4, 2, f)
        pooled = a.max(axis=(2, 4))  # (N, 4, 4, F)
        flat = pooled.reshape(n, -1)
        logits = flat @ self.w2 + self.b2
        return logits, (cols, z, a, pooled, flat)

    def step(self, x: np.ndarray, y: np.ndarray, lr: float, momentum: float = 0.9) -> float:
        n, f = x.shape[0], self.filters
        logits, (cols, z, a, pooled, flat) = self.forward(x)
        probs = softmax(logits)
        loss = float(-np.log(probs[np.arange(n), y] + 1e-12).mean())
        dlogits = probs
        dlogits[np.arange(n), y] -= 1
        dlogits /= n
        dw2, db2 = flat.T @ dlogits, dlogits.sum(0)
        dpooled = (dlogits @ self.w2.T).reshape(n, 4, 1, 4, 1, f)
        mask = a == pooled.reshape(n, 4, 1, 4, 1, f)
        dz = (dpooled * mask).reshape(n, 64, f) * (z > 0)
        dw1, db1 = cols.reshape(-1, 9).T @ dz.reshape(-1, f), dz.sum((0, 1))
        for p, v, g in zip(self.params, self.velocity, (dw1, db1, dw2, db2)):
            v *= momentum
            v -= lr * g
            p += v
        return loss

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)[0].argmax(1)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args()

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float64)
    x_train, x_val, y_train, y_val = train_test_split(
        x, digits.target, test_size=0.2, random_state=args.seed, stratify=digits.target
    )
    rng = np.random.default_rng(args.seed)
    model = SmallCNN(rng)
    run = run_context()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        losses = [
            model.step(x_train[idx], y_train[idx], args.lr)
            for idx in np.array_split(order, max(1, len(order) // args.batch_size))
        ]
        train_acc = float((model.predict(x_train) == y_train).mean())
        val_acc = float((model.predict(x_val) == y_val).mean())
        print(f"epoch {epoch:2d}  loss {np.mean(losses):.4f}  train_acc {train_acc:.4f}  val_acc {val_acc:.4f}")
        run.log("loss", float(np.mean(losses)))
        run.log("accuracy", val_acc)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "model.npz")
    np.savez(path, *model.params)
    print(f"saved {path}; final validation accuracy {val_acc:.4f}")


if __name__ == "__main__":
    main()
