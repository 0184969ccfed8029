"""Model development: training, evaluation, calibration and scoring of local files
(``dermscore train|evaluate|calibrate|calibrate-ood|evaluate-ood|predict``).

Never shipped: neither the Lambda package nor ``model.tar.gz`` contains this package.
"""
