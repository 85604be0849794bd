"""candorlm.evaluate"""
