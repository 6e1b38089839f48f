"""Batch data path: raw logs -> validated canonical tables -> Spark offline feature tables."""
