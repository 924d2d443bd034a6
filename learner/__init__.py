"""editrl.learner"""
