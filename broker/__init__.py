"""editrl.broker"""
