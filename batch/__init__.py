"""Model code: networks, training, evaluation and the SageMaker inference entry points."""
