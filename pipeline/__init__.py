"""Train, track, evaluate, register and serve a pre-activation ResNet on CIFAR-10 with MLflow."""
