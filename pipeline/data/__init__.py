"""pipeline.data"""
