"""Accuracy the MLPerf way: the ROUGE recipe of the Llama 3.1 8B reference, NLTK's punkt offline, and
the scoring of an AccuracyOnly run of a case."""
