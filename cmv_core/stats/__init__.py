"""Statistics for the judge report, over threads: resampling, comparisons, scoring rules, models."""
