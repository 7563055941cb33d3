//! Tidepool actors.
