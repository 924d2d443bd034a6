"""editrl.actor"""
