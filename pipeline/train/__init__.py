"""pipeline.train"""
