"""editrl.common"""
