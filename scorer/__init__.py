"""editrl.scorer"""
