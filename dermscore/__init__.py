"""dermscore: batch scoring of dermatoscopic images, on AWS or on one machine.

The modules in this package are the single source of truth shared by training,
inference (SageMaker and the local runner), the Lambda handlers and the CLI.
"""

__version__ = "0.1.0"
