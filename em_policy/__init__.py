"""em_policy"""
