"""candorlm.report: cards and reports rendered from artifacts other stages wrote (the data card
from curation's stats, the model card and run report from the evaluation's results.json)."""
