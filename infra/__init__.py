"""Deployment helpers: the CloudFormation/SAM template, model publishing, the local stack."""
